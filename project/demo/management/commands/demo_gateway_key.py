"""``manage.py demo_gateway_key [--snippet BASE_URL]``: make sure the demo's gateway key exists
(see project/demo/gateway_key.py) and print it, or print the ready-to-paste Python and curl
snippets for ``BASE_URL`` (e.g. http://127.0.0.1:8000/v1), as ``make run`` does."""
from __future__ import annotations

from django.core.management.base import BaseCommand

from ...gateway_key import ensure_demo_key
from ...snippet import curl_snippet, python_snippet

PYTHON_START, PYTHON_END = "# --- python ---", "# --- end python ---"


class Command(BaseCommand):
    help = "Ensure the demo's gateway key and print it (or, with --snippet, Python and curl snippets using it)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--snippet", metavar="BASE_URL", help="Print snippets against this gateway URL.")

    def handle(self, *args, snippet: str | None = None, **options) -> None:
        key, row = ensure_demo_key()
        if not row.is_active:
            self.stderr.write("The demo gateway key is deactivated (admin, Gateway keys): its requests get 401.")
        if not snippet:
            self.stdout.write(key)
            return
        base_url = snippet.rstrip("/")
        self.stdout.write(f"Python (pip install openai):\n{PYTHON_START}\n{python_snippet(base_url, key)}"
                          f"{PYTHON_END}\n\ncurl:\n{curl_snippet(base_url, key)}")
