"""Cityscapes gtFine (19 classes; train 2,975 / val 500): the official MGD and CPS recipes.

  python -m mgd_jax.main --config=configs/cityscapes.py:method=cps,teacher=resnet101,partition=8 ...
  python -m mgd_jax.main --config=configs/cityscapes.py:method=mgd,student=resnet18,partition=8 ...

Arguments as in configs/voc.py. Every number is the official one (docs/method.md §4.1, §4.6), with
its origin; where the official repo has no config (MobileNetV2 on Cityscapes) the choice is ours
and says so. On 8 GPUs a 1/8 student takes about a day (137 epochs x 162 steps of 16 at 800 px).
"""

from mgd_jax import config_lib

# exp.city/city8.resnet18_deeplabv3plus: 8 GPUs x 2, lr 0.02 NOT scaled by the world size but the
# loss is divided by it: lr_eff = 0.02 / 8 (§4.1). MobileNetV2 has no official Cityscapes config:
# our choice is the VOC MobileNetV2 λ's with the ResNet-18 schedule [unverified against the paper].
STUDENTS = {
    "resnet18": {"lr": 0.0025, "loss.lambda_image": 0.001, "loss.lambda_region": 100.0},
    "mobilenet_v2": {"lr": 0.0025, "loss.lambda_image": 0.0005, "loss.lambda_region": 50.0},
}
# exp.city/city8.{resnet101,wresnet34}: 8 GPUs x 1, lr 0.02 unscaled -> lr_eff 0.0025,
# cps_weight 5, OHEM min_kept 50000 * 8 // 8 per GPU.
_TEACHER = {"lr": 0.0025, "batch_size": 8, "replica_batch": 1, "cps.weight": 5.0,
            "loss.ohem_min_kept": 50000}
TEACHERS = {"resnet101": _TEACHER, "wide_resnet50_2": _TEACHER}


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, **config_lib.RECIPE_ARGS)
    c = config_lib.base_config()
    c.dataset, c.num_classes = "mgd_cityscapes", 19
    c.train_split, c.eval_split = "train", "val"
    c.crop_size = 800  # config.image_height / image_width
    c.num_epochs = config_lib.CITYSCAPES_EPOCHS.get(a.partition, 0)  # 137 for 1/8
    c.batch_size, c.replica_batch = 16, 2  # global: 8 GPUs x 2
    c.weight_decay = 8e-4  # 8 GPUs x 1e-4 (§4.1)
    c.loss.ohem, c.loss.ohem_thresh = True, 0.7  # ProbOhemCrossEntropy2d for L_sup (§4.6)
    c.loss.ohem_min_kept = 100000  # per GPU: 50000 * batch_size 16 // 8 GPUs
    # 800 px windows, stride ceil(800 * 2/3) = 534, summed logits (§4.7)
    c.eval.mode, c.eval.pad_to, c.eval.crop = "sliding", (1024, 2048), 800
    # The official run (as configs/voc.py): u0[i], u1[i] one image; a plain-CE L_sup (loss.ohem
    # off) averaged per replica. OHEM is per replica in any case.
    c.loss.ce_reduction = "per_replica"
    c.pairing = "official"
    c.eval_every = 1000
    return config_lib.apply_recipe(c, a, students=STUDENTS, teachers=TEACHERS)
