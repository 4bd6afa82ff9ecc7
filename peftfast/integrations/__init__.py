"""peftfast inside the libraries users already train with (transformers' `Trainer` and adapter methods)."""
