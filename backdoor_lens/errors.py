"""User-facing errors: one line saying what is wrong and what to do, exit code 2, no traceback."""


class UserError(Exception):
    """Something the user can fix (a path, a flag, a record that lacks what the analysis needs)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def needs(what: str, analysis: str) -> UserError:
    """The standard "this analysis needs X" refusal for records that lack a part."""
    return UserError(f"{analysis} needs {what}; this record has none. Choose a record or split that has it.")
