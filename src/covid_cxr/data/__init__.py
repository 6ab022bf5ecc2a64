"""Stage 1, data: the public sources in their own layouts -> one manifest with patient-level splits.

``sources`` (each collection's reader) + ``source_files`` (reading a folder we did not write), ``ingest`` (decode, hash, count what is dropped), ``dedup`` + ``hamming``
(near-duplicates), ``splits``, ``manifest`` (``covid-cxr data build``), ``publish`` (the folder swapped in
atomically), ``card`` (the dataset card and its pictures), ``fetch`` (``covid-cxr data fetch``) + ``unzip`` and ``dataset``
(reading a built dataset folder). Imports only the shared ground and :mod:`covid_cxr.imaging`; never a model.
"""
