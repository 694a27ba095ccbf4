from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class ReplyError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ReplyHeader(_message.Message):
    __slots__ = ("request_id", "tensors", "total_bytes", "meta", "error", "payload_on_data_plane")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_ON_DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    total_bytes: int
    meta: bytes
    error: ReplyError
    payload_on_data_plane: bool
    def __init__(self, request_id: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., meta: _Optional[bytes] = ..., error: _Optional[_Union[ReplyError, _Mapping]] = ..., payload_on_data_plane: bool = ...) -> None: ...

class ReplyFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ReplyHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ReplyHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_batch_size", "max_seq_len", "max_batch_tokens", "max_chunk_bytes", "max_request_tokens", "max_forward_tokens")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_FORWARD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_seq_len: int
    max_batch_tokens: int
    max_chunk_bytes: int
    max_request_tokens: int
    max_forward_tokens: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., max_request_tokens: _Optional[int] = ..., max_forward_tokens: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("num_hidden_layers", "hidden_size", "vocab_size", "dtype", "architectures", "fingerprint", "limits", "algorithms", "encodings", "eagle3_default_layer_ids", "final_logit_softcapping", "server_version", "eagle3_default_layer_ids_from_server", "dflash_default_layer_ids", "dspark_default_layer_ids", "session_ttl_s", "target_config_json")
    NUM_HIDDEN_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURES_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    EAGLE3_DEFAULT_LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOGIT_SOFTCAPPING_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    EAGLE3_DEFAULT_LAYER_IDS_FROM_SERVER_FIELD_NUMBER: _ClassVar[int]
    DFLASH_DEFAULT_LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    DSPARK_DEFAULT_LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    TARGET_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    architectures: _containers.RepeatedScalarFieldContainer[str]
    fingerprint: str
    limits: Limits
    algorithms: _containers.RepeatedScalarFieldContainer[str]
    encodings: _containers.RepeatedScalarFieldContainer[str]
    eagle3_default_layer_ids: _containers.RepeatedScalarFieldContainer[int]
    final_logit_softcapping: float
    server_version: str
    eagle3_default_layer_ids_from_server: bool
    dflash_default_layer_ids: _containers.RepeatedScalarFieldContainer[int]
    dspark_default_layer_ids: _containers.RepeatedScalarFieldContainer[int]
    session_ttl_s: float
    target_config_json: str
    def __init__(self, num_hidden_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., dtype: _Optional[str] = ..., architectures: _Optional[_Iterable[str]] = ..., fingerprint: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., algorithms: _Optional[_Iterable[str]] = ..., encodings: _Optional[_Iterable[str]] = ..., eagle3_default_layer_ids: _Optional[_Iterable[int]] = ..., final_logit_softcapping: _Optional[float] = ..., server_version: _Optional[str] = ..., eagle3_default_layer_ids_from_server: bool = ..., dflash_default_layer_ids: _Optional[_Iterable[int]] = ..., dspark_default_layer_ids: _Optional[_Iterable[int]] = ..., session_ttl_s: _Optional[float] = ..., target_config_json: _Optional[str] = ...) -> None: ...

class GetTokenizerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Tokenizer(_message.Message):
    __slots__ = ("files", "digest")
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    FILES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    files: _containers.ScalarMap[str, bytes]
    digest: str
    def __init__(self, files: _Optional[_Mapping[str, bytes]] = ..., digest: _Optional[str] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("algorithm", "layer_ids", "job_name", "capture_logits", "encodings", "weight", "selected_token_ids", "selected_token_mask", "data_plane")
    class EncodingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_LOGITS_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SELECTED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SELECTED_TOKEN_MASK_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    layer_ids: _containers.RepeatedScalarFieldContainer[int]
    job_name: str
    capture_logits: bool
    encodings: _containers.ScalarMap[str, str]
    weight: float
    selected_token_ids: Tensor
    selected_token_mask: Tensor
    data_plane: bool
    def __init__(self, algorithm: _Optional[str] = ..., layer_ids: _Optional[_Iterable[int]] = ..., job_name: _Optional[str] = ..., capture_logits: bool = ..., encodings: _Optional[_Mapping[str, str]] = ..., weight: _Optional[float] = ..., selected_token_ids: _Optional[_Union[Tensor, _Mapping]] = ..., selected_token_mask: _Optional[_Union[Tensor, _Mapping]] = ..., data_plane: bool = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "layer_ids", "encodings", "data_port", "data_ticket")
    class EncodingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    DATA_TICKET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layer_ids: _containers.RepeatedScalarFieldContainer[int]
    encodings: _containers.ScalarMap[str, str]
    data_port: int
    data_ticket: bytes
    def __init__(self, session_id: _Optional[str] = ..., layer_ids: _Optional[_Iterable[int]] = ..., encodings: _Optional[_Mapping[str, str]] = ..., data_port: _Optional[int] = ..., data_ticket: _Optional[bytes] = ...) -> None: ...

class SetVocabMappingRequest(_message.Message):
    __slots__ = ("session_id", "selected_token_ids", "selected_token_mask")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SELECTED_TOKEN_MASK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    selected_token_ids: Tensor
    selected_token_mask: Tensor
    def __init__(self, session_id: _Optional[str] = ..., selected_token_ids: _Optional[_Union[Tensor, _Mapping]] = ..., selected_token_mask: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SetVocabMappingResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "input_ids", "attention_mask", "loss_mask", "position_ids", "seq_lens", "doc_remaining", "data_plane", "trainer_step", "trainer_loss")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    LOSS_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    SEQ_LENS_FIELD_NUMBER: _ClassVar[int]
    DOC_REMAINING_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    TRAINER_STEP_FIELD_NUMBER: _ClassVar[int]
    TRAINER_LOSS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: int
    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    position_ids: Tensor
    seq_lens: Tensor
    doc_remaining: Tensor
    data_plane: bool
    trainer_step: int
    trainer_loss: float
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[int] = ..., input_ids: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., loss_mask: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., seq_lens: _Optional[_Union[Tensor, _Mapping]] = ..., doc_remaining: _Optional[_Union[Tensor, _Mapping]] = ..., data_plane: bool = ..., trainer_step: _Optional[int] = ..., trainer_loss: _Optional[float] = ...) -> None: ...

class StreamWeightsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
