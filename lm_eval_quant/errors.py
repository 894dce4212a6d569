"""User-facing errors: one line, said before any heavy work."""


class QuantArgError(ValueError):
    """A bad argument or combination. The message is a single line that says what is wrong
    and what would be right; front ends print it as ``lm-eval-quant: error: <msg>``."""

    def __init__(self, msg: str):
        super().__init__(" ".join(str(msg).split()))
