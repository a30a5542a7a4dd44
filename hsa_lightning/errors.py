"""Errors a researcher is meant to read: they name the field, the value and the rule."""


class ConfigError(ValueError):
    """An invalid configuration value, raised before any model is built."""


class PluginError(ValueError):
    """An unknown, broken or incapable plugin."""


class InferenceError(ValueError):
    """A prompt, cache or generation setting the inference engine cannot serve."""
