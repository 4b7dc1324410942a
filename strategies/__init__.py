"""Built-in strategies (importable as ``clbench.strategies``).

``BUILTINS`` is the one table of them: registered name -> ``"module:class"``, the form
of an entry point. Importing this package imports no strategy; the registry imports a
strategy's module when that strategy is used (``clbench.registry.STRATEGIES``).
"""

BUILTINS: dict[str, str] = {
    "finetune": "clbench.strategies.baselines:Finetune",
    "linear_probe": "clbench.strategies.baselines:LinearProbe",
    "joint": "clbench.strategies.baselines:Joint",
    "mora": "clbench.strategies.experts:MoRA",
    "moe_adapters": "clbench.strategies.experts:MoEAdapters",
    "inflora": "clbench.strategies.inflora:InfLoRA",
    "lora": "clbench.strategies.lora:SequentialLoRA",
    "olora": "clbench.strategies.lora:OLoRA",
    "sdlora": "clbench.strategies.lora:SDLoRA",
    "l2p": "clbench.strategies.prompts:L2P",
    "dualprompt": "clbench.strategies.prompts:DualPrompt",
    "coda_prompt": "clbench.strategies.prompts:CodaPrompt",
    "dyrank": "clbench.strategies.rank:DyRank",
    "inc_rank": "clbench.strategies.rank:IncRank",
    "source": "clbench.strategies.tta:Source",
    "bn_adapt": "clbench.strategies.tta:BNAdapt",
    "tent": "clbench.strategies.tta:Tent",
    "cotta": "clbench.strategies.tta:CoTTA",
    "eata": "clbench.strategies.tta:EATA",
    "psmt": "clbench.strategies.tta:PSMT",
    "ecotta": "clbench.strategies.tta:EcoTTA",
    "finetune_retain": "clbench.strategies.erasure:FinetuneRetain",
    "retrain": "clbench.strategies.erasure:Retrain",
    "l2": "clbench.strategies.erasure:L2",
    "ewc": "clbench.strategies.erasure:EWC",
    "mas": "clbench.strategies.erasure:MAS",
    "lwf": "clbench.strategies.erasure:LwF",
    "derpp": "clbench.strategies.erasure:DERpp",
    "scrub": "clbench.strategies.erasure:SCRUB",
    "gs_lora": "clbench.strategies.gs_lora:GSLoRA",
    "gs_lora_pp": "clbench.strategies.gs_lora:GSLoRAPP",
}
