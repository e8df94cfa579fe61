"""A third-party plugin that takes a builtin's name."""

NAME = "banner"
