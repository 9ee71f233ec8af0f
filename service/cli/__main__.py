"""``python -m service.cli``: the same CLI as the ``docqueue`` console script."""

from service.cli import app

app(prog_name="docqueue")
