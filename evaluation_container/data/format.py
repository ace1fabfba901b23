"""The Zenodo Delphes MLPF format (record 4559324, DESIGN.md §4), in one place.

Reader and generator both index columns through these names so the layout is written down once.
"""

from __future__ import annotations

KEYS = ("X", "ygen", "ycand")
TARGET_KEYS = ("ygen", "ycand")
EVENTS_PER_FILE = 100
FILE_SUFFIX = ".pkl.bz2"
FILE_GLOB = "*" + FILE_SUFFIX
FILES_PER_GROUP = 50  # tev14_pythia8_ttbar_{0..9}_{0..49}: 50 files share the first index

# Input elements (X): 12 columns.
N_X_COLUMNS = 12
TYPE_TOWER = 1
TYPE_TRACK = 2
ELEMENT_TYPES = (TYPE_TOWER, TYPE_TRACK)

X_TYPE = 0
X_PT = 1  # pT for tracks, ET for towers
X_ETA = 2
X_SIN_PHI = 3
X_COS_PHI = 4
X_E = 5
# towers
X_E_EM = 6
X_E_HAD = 7
# tracks
X_ETA_OUTER = 6
X_SIN_PHI_OUTER = 7
X_COS_PHI_OUTER = 8
X_CHARGE = 9
X_IS_GEN_MUON = 10
X_IS_GEN_ELECTRON = 11

# Targets (ygen, ycand): 7 columns; row i belongs to element i, an all-zero row means "no particle".
N_Y_COLUMNS = 7
Y_CLASS = 0
Y_CHARGE = 1
Y_PT = 2
Y_ETA = 3
Y_SIN_PHI = 4
Y_COS_PHI = 5
Y_E = 6

CLASS_NONE = 0
CLASS_CHARGED_HADRON = 1
CLASS_NEUTRAL_HADRON = 2
CLASS_PHOTON = 3
CLASS_ELECTRON = 4
CLASS_MUON = 5
CLASS_NAMES = ("none", "charged_hadron", "neutral_hadron", "photon", "electron", "muon")
N_CLASSES = len(CLASS_NAMES)
CHARGED_CLASSES = (CLASS_CHARGED_HADRON, CLASS_ELECTRON, CLASS_MUON)
NEUTRAL_CLASSES = (CLASS_NEUTRAL_HADRON, CLASS_PHOTON)


def file_name(index: int, sample: str = "ttbar") -> str:
    """The Zenodo name of the ``index``-th file: 0 → ``tev14_pythia8_ttbar_0_0.pkl.bz2``, 50 → ``..._1_0...``."""
    group, number = divmod(index, FILES_PER_GROUP)
    return f"tev14_pythia8_{sample}_{group}_{number}{FILE_SUFFIX}"
