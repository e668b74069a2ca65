"""The commands as recipes: the stages each runs, in order, and the gates it requires (commands.py)."""
