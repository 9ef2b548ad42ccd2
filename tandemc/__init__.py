"""tandemc: a model compiler for Tandem Transformers."""

__version__ = "0.1.0"
