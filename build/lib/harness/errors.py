"""The one exception type for errors the user can fix; its message says what to change."""


class UserError(Exception):
    pass
