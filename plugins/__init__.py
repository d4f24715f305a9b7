"""Built-in compression plugins, installed as ``edgepack.plugins``."""
