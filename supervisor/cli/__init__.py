"""localllmctl: the operator's commands, their client of the control API and their tables."""
