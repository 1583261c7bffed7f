"""card.md: the model card of a run folder (what the model is, what it was trained on, how well it did,
how to use it, its limits), rewritten after every epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def model_card(
    config: dict[str, Any], meta: dict[str, Any], best: dict[str, Any] | None, run_dir: Path, health: str = ""
) -> str:
    """card.md: what the model is, what it was trained on, how well it did, and how to use it."""
    lines = [
        *_what_and_input(meta, run_dir),
        *_training(config, meta, run_dir),
        "",
        "## Results (validation, selected checkpoint `best.safetensors`)",
        *_results(config, best),
    ]
    if health:
        lines += ["", "## Training health", f"- {health}"]
    lines += [
        "",
        "`val_share_inside` is the mean fraction of the absolute LRP relevance that falls inside the mask",
        "(1.0 = the model looks only at the lungs). See `metrics.csv` and `curves.png` for every epoch.",
        "",
        "## Limitations",
        "- Validation figures are i.i.d.: performance on other hospitals, devices or populations is unknown",
        "  until measured (`isnet evaluate`, `isnet audit`).",
        "- Relevance inside the lungs does not prove the model uses clinically meaningful features.",
        "",
    ]
    return "\n".join(lines)


def _what_and_input(meta: dict[str, Any], run_dir: Path) -> list[str]:
    """The card's title, what the model is, its intended use and its input."""
    isnet = meta.get("isnet", {})
    contract = meta.get("contract", {})
    variant = isnet.get("variant")
    kind = (
        "a standard classifier (no heatmap loss; baseline)"
        if variant == "none" and isnet.get("method") != "rrr"
        else "a Right-for-the-Right-Reasons classifier (input-gradient penalty on the background)"
        if isnet.get("method") == "rrr"
        else f"an ISNet ({variant}): trained so its LRP relevance stays inside the mask"
    )
    return [
        f"# Model card: {run_dir.name}",
        "",
        f"**What it is**: {kind}, architecture `{meta.get('arch')}`, classes {meta.get('classes')}.",
        "",
        "## Intended use",
        "Research on chest X-ray classification and background-bias mitigation. Not a medical device: do not use",
        "it for diagnosis. Masks were needed only for training; at run time it is the plain classifier.",
        "",
        "## Input",
        f"- {contract.get('channels', 1)} channel(s), {contract.get('size')} x {contract.get('size')} px, "
        f"resize `{contract.get('resize')}`, DICOM window `{contract.get('window')}`, values in "
        f"[{contract.get('low', 0.0)}, {contract.get('high', 1.0)}] (air dark).",
        f"- Training masks outline the region of interest: {contract.get('roi_name', 'lung')}.",
        "- `isnet predict/explain/evaluate` apply this preprocessing from the checkpoint automatically.",
    ]


def _training(config: dict[str, Any], meta: dict[str, Any], run_dir: Path) -> list[str]:
    """The training data and the training settings."""
    isnet = meta.get("isnet", {})
    data = meta.get("data", {})
    lines = [
        "",
        "## Training data",
        f"- manifest: `{data.get('manifest')}` (sha256 {str(data.get('sha256', ''))[:16]}...)",
        f"- training samples per class: {data.get('train_counts')}",
        f"- validation samples per class: {data.get('val_counts')} ({data.get('val_source')})",
    ]
    if data.get("ood_manifest"):
        lines.append(f"- out-of-distribution set: `{data.get('ood_manifest')}` ({data.get('ood_count')} images)")
    return [
        *lines,
        "",
        "## Training",
        f"- variant `{isnet.get('variant')}`, method `{isnet.get('method')}`, P={isnet.get('P')}, "
        f"d={isnet.get('d')}, E={isnet.get('E')}, A={isnet.get('A')}, B={isnet.get('B')}, LRP eps={isnet.get('eps')}, "
        f"C1={_num(isnet.get('C1'))}, C2={_num(isnet.get('C2'))} ({isnet.get('cut_source')}), "
        f"background swap {isnet.get('background_swap', 0)}, warm start {isnet.get('warm_start', False)}, "
        f"P ramped over {isnet.get('ramp', 0)} epochs" + _lds_text(isnet),
        f"- optimizer {config.get('optimizer')} lr {config.get('lr')}, {config.get('epochs')} epochs, batch "
        f"{config.get('batch_size')}, scheduler {config.get('scheduler')}, seed {config.get('seed')}, "
        f"deterministic {config.get('deterministic')}",
        f"- full configuration: `config.json`; re-run with `isnet train --config {run_dir / 'config.yaml'}`",
    ]


def _results(config: dict[str, Any], best: dict[str, Any] | None) -> list[str]:
    """The selected checkpoint's validation metrics."""
    if not best:
        return ["- no completed epoch"]
    keys = ("epoch", "val_loss", "val_accuracy", "val_macro_f1", "val_auroc", "val_share_inside", "ood_accuracy")
    lines = [f"- {key}: {_num(best[key])}" for key in keys if best.get(key) not in (None, "")]
    return [*lines, f"- selected by: {config.get('select_by')}"]


def _num(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def _lds_text(isnet: dict[str, Any]) -> str:
    """The model card's note on LRP deep supervision: each hidden layer with its C1/C2."""
    cuts = isnet.get("lds_cuts")
    if not cuts:
        return ""
    layers = ", ".join(f"`{name}` C1={_num(c[0])} C2={_num(c[1])}" for name, c in cuts.items())
    return f"; LRP deep supervision (GWRP decay {isnet.get('lds_decay')} over layers): {layers}"
