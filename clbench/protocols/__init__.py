"""Evaluation protocols, one per scenario kind.

``BUILTINS`` is the one table of the built-in ones: scenario kind -> ``"module:class"``,
the form of an entry point (group ``clbench.protocols``). Importing this package imports
no protocol (nor torch); the registry imports one when it is used
(``clbench.registry.PROTOCOLS``).
"""

BUILTINS: dict[str, str] = {
    "class_incremental": "clbench.protocols.class_incremental:ClassIncremental",
    "test_time": "clbench.protocols.tta:TestTimeAdaptation",
    "forgetting": "clbench.protocols.forgetting:Forgetting",
    "mil": "clbench.protocols.mil:MultipleInstance",
}
