"""The DICOM node: pynetdicom SCP handlers and SCU senders."""
