"""What a model does and why: metrics, evaluation reports, the lung audit, LRP explanations, figures."""
