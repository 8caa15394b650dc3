"""The offline toxicity scorer and its files: a run-time part (it drives `--condition`,
`--diagnoser scorer` and the chat's escalation) that the evaluation's judges also use.

- ``scorer``: the Keras BiLSTM classifiers (tox-block, toxic-comment-classifier) run in numpy;
- ``keras_files``: their h5 weights and pickled tokenizers, read without Keras;
- ``prepared``: the scorers' prepared copies in the user's cache folder (later loads skip the pickles);
- ``safe_pickle``: the restricted unpickler those tokenizers go through;
- ``files``: where the files are, each sha256-pinned.
"""
