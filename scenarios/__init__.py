"""Built-in scenarios (importable as ``clbench.scenarios``).

``BUILTINS`` is the one table of them: registered name -> ``"module:builder"``, the form
of an entry point. Importing this package imports no scenario; the registry imports a
scenario's module when that scenario is built (``clbench.registry.SCENARIOS``).
"""

BUILTINS: dict[str, str] = {
    "split_digits": "clbench.scenarios.digits:split_digits",
    "split_glyphs": "clbench.scenarios.glyphs:split_glyphs",
    "split_cifar100": "clbench.scenarios.images:split_cifar100",
    "imagenet_r": "clbench.scenarios.images:imagenet_r",
    "cub200": "clbench.scenarios.images:cub200",
    "domainnet": "clbench.scenarios.images:domainnet",
    "digits_c": "clbench.scenarios.tta:digits_c",
    "cifar10_c": "clbench.scenarios.tta:cifar10_c",
    "cifar100_c": "clbench.scenarios.tta:cifar100_c",
    "imagenet_c": "clbench.scenarios.tta:imagenet_c",
    "glyph_forget": "clbench.scenarios.forgetting:glyph_forget",
    "digits_forget": "clbench.scenarios.forgetting:digits_forget",
    "imagefolder_forget": "clbench.scenarios.imagefolder:imagefolder_forget",
    "digit_bags": "clbench.scenarios.digit_bags:digit_bags",
    "clam_bags": "clbench.scenarios.clam:clam_bags",
    "tcga_conslide": "clbench.scenarios.clam:tcga_conslide",
    "comel_organs": "clbench.scenarios.clam:comel_organs",
}
