"""nnU-Net plans (and a matching dataset.json) of a PlainConvUNet, built in code: the benchmarks'
network and the tests' tiny one, without planning a dataset."""
from __future__ import annotations


def default_plans(patch, features, dim: int, norm: str | None = None, configuration: str = "bench") -> dict:
    """nnU-Net plans of a PlainConvUNet (InstanceNorm unless ``norm`` names another norm class)
    with one configuration; also the tests' tiny network (tests/test_trainers_units.py)."""
    conv = "torch.nn.modules.conv.Conv3d" if dim == 3 else "torch.nn.modules.conv.Conv2d"
    norm = norm or f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    n = len(features)
    return {
        "dataset_name": "Dataset999_Bench", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0] * dim, "original_median_shape_after_transp": list(patch),
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(range(dim)),
        "transpose_backward": list(range(dim)), "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
        "configurations": {configuration: {
            "data_identifier": "bench", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(patch), "median_image_size_in_voxels": list(patch), "spacing": [1.0] * dim,
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {},
            "batch_dice": False,
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {"n_stages": n, "features_per_stage": list(features), "conv_op": conv,
                                "kernel_sizes": [[3] * dim] * n, "strides": [[1] * dim] + [[2] * dim] * (n - 1),
                                "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1),
                                "conv_bias": True, "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                                "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}


def default_dataset_json(n_classes: int, n_channels: int = 1) -> dict:
    """A dataset.json for :func:`default_plans`: ``n_classes`` labels (background included), no regions."""
    return {"channel_names": {str(i): f"channel_{i}" for i in range(n_channels)},
            "labels": {"background": 0, **{f"class_{i}": i for i in range(1, n_classes)}},
            "numTraining": 0, "file_ending": ".nii.gz"}
