"""Small nnU-Net architectures (dynamic_network_architectures) for the conversion and AC-Corr tests."""
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn


def plain_conv_unet(norm=nn.InstanceNorm3d):
    return PlainConvUNet(1, 4, (8, 16, 24, 32), nn.Conv3d, 3, (1, 2, 2, 2), (2, 2, 2, 2), 3, (2, 2, 2),
                         True, norm, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=True)


def residual_encoder_unet():
    return ResidualEncoderUNet(1, 4, (8, 16, 24, 32), nn.Conv3d, 3, (1, 2, 2, 2), (1, 2, 2, 2), 3,
                               (1, 1, 1), True, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None,
                               None, nn.LeakyReLU, {"inplace": True}, deep_supervision=True)
