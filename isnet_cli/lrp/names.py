"""The LRP vocabulary, torch-free: rule names and explanation targets. The engine validates against
these registries and the command line offers them as choices (`click.Choice(RULES)`)."""

# Rules for conv/linear layers (the first layer always uses FIRST_RULES[0], zB, unless told otherwise).
RULES = ("epsilon", "zplus", "alphabeta")
FIRST_RULES = ("zb", "epsilon")
