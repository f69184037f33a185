"""fcgipool: a FastCGI process manager that sits in the data path."""

__version__ = "0.1.0"
