"""Backbones.

``BUILTINS`` is the one table of the built-in ones: registered name -> ``"module:builder"``,
the form of an entry point. Importing this package imports no backbone; the registry
imports a backbone's module when that backbone is built (``clbench.registry.BACKBONES``).
"""

BUILTINS: dict[str, str] = {
    "micro_vit": "clbench.backbones.embedded:micro_vit",
    "vit_b16": "clbench.backbones.vit:vit_b16",
    "clip_tiny": "clbench.backbones.clip:clip_tiny",
    "clip_vit_b16": "clbench.backbones.clip:clip_vit_b16",
    "wideresnet": "clbench.backbones.wideresnet:wideresnet",
    "abmil": "clbench.backbones.mil:abmil",
    "transmil": "clbench.backbones.mil:transmil",
    "gdat": "clbench.backbones.mil:gdat",
}
