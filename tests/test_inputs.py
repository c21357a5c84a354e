"""nnunet_acnorm/inputs.py: the guarded reads the layers share."""
from __future__ import annotations

import hashlib

import pytest

from nnunet_acnorm.errors import InputError
from nnunet_acnorm.inputs import read_json_object, sha256_file


class _Refused(InputError):
    pass


def test_read_json_object_returns_the_object(tmp_path):
    path = tmp_path / "plans.json"
    path.write_text('{"plans_name": "nnUNetPlans", "configurations": {}}')
    assert read_json_object(path, _Refused) == {"plans_name": "nnUNetPlans", "configurations": {}}


@pytest.mark.parametrize("content, says", [(None, "FileNotFoundError"), ("{not json", "JSONDecodeError"),
                                           ("[1, 2]", "a JSON object is expected, found list"),
                                           ("\xff\xfe", "not readable JSON")])
def test_read_json_object_refuses_in_one_line_of_the_callers_type(tmp_path, content, says):
    path = tmp_path / "dataset.json"
    if content is not None:
        path.write_bytes(content.encode("latin-1"))
    with pytest.raises(_Refused) as info:
        read_json_object(path, _Refused)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and says in message and "\n" not in message


def test_sha256_file_matches_hashlib_across_blocks(tmp_path):
    data = bytes(range(256)) * 9000  # over two of its 1 MiB blocks
    path = tmp_path / "archive.tar.gz"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    path.write_bytes(b"")
    assert sha256_file(path) == hashlib.sha256(b"").hexdigest()
