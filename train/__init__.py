"""Stage trainers and entry points; ``train.cli`` is the ``mim`` command."""
