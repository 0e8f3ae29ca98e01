"""Exporters (host side): a jflame folder rewritten in the files another tool reads, each
format's conventions in its own module and in docs/FORMAT.md ("Exports"). `jflame-export` runs
them; `common` holds what every format shares (the FLAME variant rule, padding, the README)."""
