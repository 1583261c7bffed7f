"""The ISNet training objective: the heatmap loss (background GWRP + foreground band) and the RRR
baseline (`loss`), automatic C1/C2 (`tuning`), the per-batch objective through the LRP engine
(`objective`), the background-swap augmentation (`swap`), and the variant/method registries
(`variants`, torch-free like `tuning`)."""
