"""COCO export, import and evaluation for Label Studio projects.

* :mod:`.export`: Label Studio JSON (file, task list or live project) -> COCO instances,
  brush masks included (as RLE or polygons), annotations and/or predictions.
* :mod:`.importer`: COCO instances (+ results) -> Label Studio tasks with predictions.
* :mod:`.evaluate`: COCO bbox/segm AP/AR (pycocotools) and the referring-expression
  metrics of the NExT-Chat paper (REC Acc@0.5, mean IoU, RES mIoU/cIoU).

All geometry is converted by :mod:`nextchat_core.frames`; Label Studio JSON is parsed and
built by :mod:`labelstudio.results`.
"""
