"""`cnnexplain --help`: each command's row shows its first help paragraph on one line."""

import inspect

from cnnexplain.cli.main import _register, app


def test_every_command_row_is_its_first_paragraph_on_one_line():
    _register()
    assert len(app.registered_commands) >= 6
    for info in app.registered_commands:
        text = info.help or inspect.getdoc(info.callback)
        first = text.split("\n\n")[0]
        assert info.short_help == " ".join(first.split()), info.name
        assert "\n" not in info.short_help
