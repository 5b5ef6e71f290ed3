"""DIMSE status codes we answer with (PS3.4 Annex B/C, PS3.7 Annex C)."""

SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # C-FIND: optional keys not supported (PS3.4 C.4.1.1.4)
CANCEL = 0xFE00
SUBOPS_WARNING = 0xB000  # C-GET/C-MOVE: some sub-operations failed
PROCESSING_FAILURE = 0x0110  # general failure (PS3.7 C.4.2): an error of ours

# C-STORE (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900  # data set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # data set cannot be parsed
MISSING_INSTANCE_UID = 0xC001  # our code in the C000-CFFF "cannot understand" range
MISSING_HIERARCHY_UID = 0xC002  # likewise: no Study/Series Instance UID

# Query/Retrieve (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4)
QR_OUT_OF_RESOURCES = 0xA700
QR_SUBOPS_OUT_OF_RESOURCES = 0xA702
QR_MOVE_DESTINATION_UNKNOWN = 0xA801
QR_IDENTIFIER_MISMATCH = 0xA900
QR_UNABLE_TO_PROCESS = 0xC000
