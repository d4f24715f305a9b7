"""Built-in hardware targets, installed as ``edgepack.targets``."""
