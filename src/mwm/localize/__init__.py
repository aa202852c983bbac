"""Text-guided localization: saliency maps from a vision-language model, their
postprocessing into region masks (:mod:`mwm.localize.postprocess`, :mod:`mwm.localize.crf`)
and the folder-level evaluation of those masks (:mod:`mwm.localize.evaluate`).

Submodules are imported explicitly (``from mwm.localize.postprocess import postprocess``)
so that importing one stage never loads the models of another.
"""
