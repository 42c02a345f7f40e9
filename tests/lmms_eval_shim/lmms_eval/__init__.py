"""A test stand-in for the parts of lmms-eval that vsink's model plugin
(:mod:`vsink.integrations.lmms_eval`) touches, so the plugin's code path runs where lmms-eval is
not installed (it brings ~100 packages; CI does not install it). NOT lmms-eval: written from a
reading of EvolvingLMMs-Lab/lmms-eval at commit 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3
(version 0.7.2), reproducing only the behaviour of:

* ``lmms_eval/api/model.py``: ``lmms`` (``is_simple``, ``__init__`` setting rank, world size,
  a no-op ``cache_hook`` and an empty ``task_dict``; the abstract ``loglikelihood``,
  ``generate_until`` and ``generate_until_multi_round``; ``create_from_arg_string``) and
  ``CacheHook``;
* ``lmms_eval/api/instance.py``: ``Instance`` (metadata a dict with ``task``, ``doc_id``,
  ``repeats``; ``args``);
* ``lmms_eval/utils.py``: ``simple_parse_args_string`` (commas split outside quotes and
  brackets; values through ``handle_arg_string``);
* ``lmms_eval/models/registry_v2.py`` and ``lmms_eval/models/__init__.py``: ``ModelManifest``,
  manifests loaded from the ``lmms_eval.models`` entry-point group, ``get_model`` resolving a
  name to its class and checking it subclasses ``lmms`` with a matching ``is_simple``.

``tests/lmms_eval_api.py`` puts this folder on ``sys.path`` only when the real package is not
importable; where it is, the same tests run against lmms-eval itself.
"""

SHIM = True
