"""The 19 VTAB-1k tasks (name, group, classes, folder aliases): plain Python, so that the config
resolvers (``task.num_classes``) answer without importing the training stack."""
from __future__ import annotations

# canonical name -> (group, classes, folder aliases used by other repositories)
VTAB_TASKS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "cifar": ("natural", 100, ("cifar100", "cifar_100")),
    "caltech101": ("natural", 102, ("caltech", "caltech_101")),
    "dtd": ("natural", 47, ()),
    "oxford_flowers102": ("natural", 102, ("flowers102", "flowers", "oxford_flowers")),
    "oxford_iiit_pet": ("natural", 37, ("pets", "oxford_pet", "pet")),
    "svhn": ("natural", 10, ("svhn_cropped",)),
    "sun397": ("natural", 397, ("sun",)),
    "patch_camelyon": ("specialized", 2, ("camelyon", "pcam")),
    "eurosat": ("specialized", 10, ()),
    "resisc45": ("specialized", 45, ("resisc",)),
    "diabetic_retinopathy": ("specialized", 5, ("retinopathy", "diabetic_retinopathy_detection")),
    "clevr_count": ("structured", 8, ("clevr_count_all",)),
    "clevr_dist": ("structured", 6, ("clevr_closest_object_distance", "clevr_distance")),
    "dmlab": ("structured", 6, ()),
    "kitti": ("structured", 4, ("kitti_dist", "kitti_closest_vehicle_distance")),
    "dsprites_loc": ("structured", 16, ("dsprites_location", "dsprites_label_x_position")),
    "dsprites_ori": ("structured", 16, ("dsprites_orientation", "dsprites_label_orientation")),
    "smallnorb_azi": ("structured", 18, ("snorb_azi", "smallnorb_azimuth", "smallnorb_label_azimuth")),
    "smallnorb_ele": ("structured", 9, ("snorb_ele", "smallnorb_elevation", "smallnorb_label_elevation")),
}
GROUPS = ("natural", "specialized", "structured")


def canonical_task(name: str) -> str:
    """``name`` if it is one of the 19 canonical VTAB task names, exactly.

    Never a substring or an alias: a folder of your own called ``pets`` is not Oxford-IIIT Pet (the
    aliases only find the canonical task's folder on disk, :func:`find_task_dir`).
    """
    if name in VTAB_TASKS:
        return name
    raise ValueError(f"unknown VTAB task {name!r}; valid tasks: {', '.join(VTAB_TASKS)}. For a folder of your own "
                     f"images use data.layout=imagefolder data.root=DIR (DIR/[train|val|test]/<class>/*)")


def num_classes(name: str) -> int:
    return VTAB_TASKS[canonical_task(name)][1]
