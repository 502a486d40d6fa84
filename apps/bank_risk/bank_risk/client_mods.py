"""The ClientApp mods the bank app runs, outermost first.

Flower applies ``ClientApp(mods=[a, b])`` as ``a(b(handler))``: ``a`` sees the
reply last. The order follows the client side of a round (DESIGN.md): the
handler trains and replies with full weights; an attack (test federations
only) rewrites the update; compression sparsifies what will be sent;
encryption, outermost, sees exactly what leaves the bank. Each mod is a no-op
unless the run config turns it on.
"""

from __future__ import annotations

from flwr.clientapp.typing import Mod

BANK_MODS: list[Mod] = []
