"""The local web app: human preference labelling (``rlhf-ray annotate``) and the PPO run viewer
(``rlhf-ray view``). Standard library only at serve time (``http.server`` + ``sqlite3``); the
agreement statistics use scikit-learn and ``krippendorff``, imported when asked for."""
