"""compress() arguments for tests, which set SubFitConfig and DevOptions fields side by side."""


def settings(**fields) -> dict:
    """compress() keyword arguments from flat SubFitConfig / DevOptions fields (tests set both)."""
    from dataclasses import fields as dataclass_fields

    from subfit.config import DevOptions, SubFitConfig

    config_names = {f.name for f in dataclass_fields(SubFitConfig)}
    return {"config": SubFitConfig(**{k: v for k, v in fields.items() if k in config_names}),
            "dev": DevOptions(**{k: v for k, v in fields.items() if k not in config_names}), "progress": False}
