"""PASCAL VOC 2012 + SBD (train_aug 10,582 / val 1,449): the official MGD and CPS recipes.

  python -m mgd_jax.main --config=configs/voc.py:method=cps,teacher=resnet101,partition=8 ...
  python -m mgd_jax.main --config=configs/voc.py:method=mgd,student=resnet18,partition=8 \
      --config.teacher_deep.checkpoint=DIR --config.teacher_wide.checkpoint=DIR ...

Arguments (`config_lib.RECIPE_ARGS`): method (supervised | cps | mgd), student (resnet18 |
mobilenet_v2), teacher (the CPS backbone: resnet101 | wide_resnet50_2), partition (16 | 8 | 4 | 2),
smoke. Every number is the official one (docs/method.md §4), with its origin. On 4 GPUs a 1/8
student runs 34 epochs x 1,157 steps; `smoke` runs a few steps at a small size.
"""

from mgd_jax import config_lib

# exp.voc/voc8.{resnet18,mobilev2}_deeplabv3plus: script.sh learning_rate (= lr_eff, §4.1) and
# config.py lambda_1 / lambda_2.
STUDENTS = {
    "resnet18": {"lr": 0.0025, "loss.lambda_image": 0.002, "loss.lambda_region": 100.0},
    "mobilenet_v2": {"lr": 0.0035, "loss.lambda_image": 0.0005, "loss.lambda_region": 50.0},
}
# exp.voc/voc8.{resnet101,wresnet34}_deeplabv3plus: script.sh learning_rate, cps_weight 1.
TEACHERS = {
    "resnet101": {"lr": 0.0025, "cps.weight": 1.0},
    "wide_resnet50_2": {"lr": 0.001, "cps.weight": 1.0},
}


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, **config_lib.RECIPE_ARGS)
    c = config_lib.base_config()
    c.dataset, c.num_classes = "mgd_voc_aug", 21
    c.train_split, c.eval_split = "train_aug", "val"
    c.crop_size = 512  # config.image_height / image_width
    c.num_epochs = config_lib.VOC_EPOCHS.get(a.partition, 0)  # 34 for 1/8; apply_recipe checks
    c.batch_size, c.replica_batch = 8, 2  # global: 4 GPUs x 2 (script.sh batch_size=8)
    c.weight_decay = 4e-4  # 4 GPUs x 1e-4: the loss / world_size scaling quirk (§4.1)
    c.eval.mode, c.eval.pad_to, c.eval.crop = "whole", (512, 512), 512  # pad to 512 (§4.7)
    # The official run, not our cleaner alternatives (docs/reproducing.md, "Deliberate choices"):
    # L_sup averaged per GPU (groups of replica_batch), then over GPUs; u0[i], u1[i] one image.
    c.loss.ce_reduction = "per_replica"  # "global": one mean over the batch's valid pixels
    c.pairing = "official"  # "independent": two random unlabeled orders
    c.eval_every = 2000
    return config_lib.apply_recipe(c, a, students=STUDENTS, teachers=TEACHERS)
