"""Where the data sets insitu does not ship come from: one sentence each, for error messages.

Kept free of imports so that a configuration error can name the origin without loading torch.
"""
from __future__ import annotations

#: PneumoniaMNIST and the other MedMNIST 2D sets: one .npz each, licence CC BY 4.0
MEDMNIST_ORIGIN = "insitu does not ship it: download pneumoniamnist.npz, or another MedMNIST 2D .npz, from https://medmnist.com"

#: The PhysioNet/CinC Challenge 2012 (ICU mortality): set-a/b/c.tar.gz and Outcomes-a/b/c.txt
PHYSIONET2012_ORIGIN = ("insitu does not ship it: download set-a.tar.gz, set-b.tar.gz, set-c.tar.gz and "
                        "Outcomes-a.txt, Outcomes-b.txt, Outcomes-c.txt from https://physionet.org/content/challenge-2012/ "
                        "into one folder")

__all__ = ["MEDMNIST_ORIGIN", "PHYSIONET2012_ORIGIN"]
