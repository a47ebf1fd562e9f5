"""`UserError`: the base of every error a user's input or machine causes (a
config value, an unprepared or damaged dataset, a checkpoint that does not
fit or cannot be read, a workdir in use, a full disk). The command line
(moe.config_flag.run, python -m moe.data) reports one in a single line,
`FATAL <error>: <message>`, exit 1, without a traceback; any other error
keeps its traceback."""


class UserError(Exception):
  """Bad input or an unfit machine; the message names what and how to fix it."""
