"""One notifier per integration behind one interface (:class:`relay.notifiers.base.Notifier`).

Every module of this package registers its integration when imported; :func:`integrations`
imports them all, so adding a notifier is adding a module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping

from mlwarden.relay.notifiers.base import REGISTRY, Context, Destination, Integration, Notifier


def integrations() -> Mapping[str, Integration]:
    """Every registered integration by type name, in the order of their module names."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return {name: REGISTRY[name] for name in sorted(REGISTRY)}


def notifier_for(destination: Destination, context: Context) -> Notifier:
    return integrations()[destination.type].notifier(destination, context)
