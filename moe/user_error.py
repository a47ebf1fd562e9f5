"""`UserError`: the base of every error bad input or an unfit machine causes
(a config value, a dataset, a checkpoint, a workdir in use, a full disk). The
command line reports one as `FATAL <error>: <message>`, exit 1, no traceback."""


class UserError(Exception):
  """Bad input or an unfit machine; the message names what and how to fix it."""
