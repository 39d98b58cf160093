from protos.v1 import jobs_pb2 as _jobs_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArtifactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_KIND_UNSPECIFIED: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_FILE: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_JUNIT: _ClassVar[ArtifactKind]

class JobOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_OUTCOME_UNSPECIFIED: _ClassVar[JobOutcome]
    JOB_OUTCOME_EXITED: _ClassVar[JobOutcome]
    JOB_OUTCOME_TIMED_OUT: _ClassVar[JobOutcome]
    JOB_OUTCOME_CANCELED: _ClassVar[JobOutcome]
    JOB_OUTCOME_ERROR: _ClassVar[JobOutcome]

class PullPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PULL_POLICY_UNSPECIFIED: _ClassVar[PullPolicy]
    PULL_POLICY_NEVER: _ClassVar[PullPolicy]
    PULL_POLICY_IF_NOT_PRESENT: _ClassVar[PullPolicy]
    PULL_POLICY_ALWAYS: _ClassVar[PullPolicy]
ARTIFACT_KIND_UNSPECIFIED: ArtifactKind
ARTIFACT_KIND_FILE: ArtifactKind
ARTIFACT_KIND_JUNIT: ArtifactKind
JOB_OUTCOME_UNSPECIFIED: JobOutcome
JOB_OUTCOME_EXITED: JobOutcome
JOB_OUTCOME_TIMED_OUT: JobOutcome
JOB_OUTCOME_CANCELED: JobOutcome
JOB_OUTCOME_ERROR: JobOutcome
PULL_POLICY_UNSPECIFIED: PullPolicy
PULL_POLICY_NEVER: PullPolicy
PULL_POLICY_IF_NOT_PRESENT: PullPolicy
PULL_POLICY_ALWAYS: PullPolicy

class JobLease(_message.Message):
    __slots__ = ("job_id", "epoch")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class ArtifactHeader(_message.Message):
    __slots__ = ("job_id", "epoch", "path", "kind", "size", "sha256")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    path: str
    kind: ArtifactKind
    size: int
    sha256: str
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ..., path: _Optional[str] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ArtifactUpload(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ArtifactHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ArtifactHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ArtifactStored(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class RunningJob(_message.Message):
    __slots__ = ("job_id", "epoch")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("running_jobs", "max_jobs", "version", "labels", "runtimes")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUNNING_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_JOBS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RUNTIMES_FIELD_NUMBER: _ClassVar[int]
    running_jobs: _containers.RepeatedCompositeFieldContainer[RunningJob]
    max_jobs: int
    version: str
    labels: _containers.ScalarMap[str, str]
    runtimes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, running_jobs: _Optional[_Iterable[_Union[RunningJob, _Mapping]]] = ..., max_jobs: _Optional[int] = ..., version: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., runtimes: _Optional[_Iterable[str]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("running_jobs", "draining")
    RUNNING_JOBS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    running_jobs: _containers.RepeatedCompositeFieldContainer[RunningJob]
    draining: bool
    def __init__(self, running_jobs: _Optional[_Iterable[_Union[RunningJob, _Mapping]]] = ..., draining: _Optional[bool] = ...) -> None: ...

class JobRefused(_message.Message):
    __slots__ = ("job_id", "epoch", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class JobAccepted(_message.Message):
    __slots__ = ("job_id", "epoch")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class JobStarted(_message.Message):
    __slots__ = ("job_id", "epoch")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class LogEntry(_message.Message):
    __slots__ = ("stream", "data")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    stream: _jobs_pb2.LogStream
    data: bytes
    def __init__(self, stream: _Optional[_Union[_jobs_pb2.LogStream, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LogBatch(_message.Message):
    __slots__ = ("job_id", "epoch", "seq", "entries")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    seq: int
    entries: _containers.RepeatedCompositeFieldContainer[LogEntry]
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ..., seq: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("job_id", "epoch", "last_seq", "outcome", "exit_code", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    last_seq: int
    outcome: JobOutcome
    exit_code: int
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ..., last_seq: _Optional[int] = ..., outcome: _Optional[_Union[JobOutcome, str]] = ..., exit_code: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "accepted", "started", "log_batch", "result", "refused")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    LOG_BATCH_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    accepted: JobAccepted
    started: JobStarted
    log_batch: LogBatch
    result: JobResult
    refused: JobRefused
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., accepted: _Optional[_Union[JobAccepted, _Mapping]] = ..., started: _Optional[_Union[JobStarted, _Mapping]] = ..., log_batch: _Optional[_Union[LogBatch, _Mapping]] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ..., refused: _Optional[_Union[JobRefused, _Mapping]] = ...) -> None: ...

class AssignJob(_message.Message):
    __slots__ = ("job_id", "epoch", "spec", "secret_env", "pull_policy", "allowed_images", "runtime")
    class SecretEnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SECRET_ENV_FIELD_NUMBER: _ClassVar[int]
    PULL_POLICY_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    epoch: int
    spec: _jobs_pb2.JobSpec
    secret_env: _containers.ScalarMap[str, str]
    pull_policy: PullPolicy
    allowed_images: _containers.RepeatedScalarFieldContainer[str]
    runtime: str
    def __init__(self, job_id: _Optional[str] = ..., epoch: _Optional[int] = ..., spec: _Optional[_Union[_jobs_pb2.JobSpec, _Mapping]] = ..., secret_env: _Optional[_Mapping[str, str]] = ..., pull_policy: _Optional[_Union[PullPolicy, str]] = ..., allowed_images: _Optional[_Iterable[str]] = ..., runtime: _Optional[str] = ...) -> None: ...

class CancelJob(_message.Message):
    __slots__ = ("job_id", "reason", "abandon")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ABANDON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    abandon: bool
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ..., abandon: _Optional[bool] = ...) -> None: ...

class LogAck(_message.Message):
    __slots__ = ("job_id", "seq")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seq: int
    def __init__(self, job_id: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class ResultAck(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class TrustBundle(_message.Message):
    __slots__ = ("ca_bundle_pem",)
    CA_BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    ca_bundle_pem: bytes
    def __init__(self, ca_bundle_pem: _Optional[bytes] = ...) -> None: ...

class ControlMessage(_message.Message):
    __slots__ = ("assign", "cancel", "log_ack", "result_ack", "trust_bundle")
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    LOG_ACK_FIELD_NUMBER: _ClassVar[int]
    RESULT_ACK_FIELD_NUMBER: _ClassVar[int]
    TRUST_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    assign: AssignJob
    cancel: CancelJob
    log_ack: LogAck
    result_ack: ResultAck
    trust_bundle: TrustBundle
    def __init__(self, assign: _Optional[_Union[AssignJob, _Mapping]] = ..., cancel: _Optional[_Union[CancelJob, _Mapping]] = ..., log_ack: _Optional[_Union[LogAck, _Mapping]] = ..., result_ack: _Optional[_Union[ResultAck, _Mapping]] = ..., trust_bundle: _Optional[_Union[TrustBundle, _Mapping]] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    def __init__(self, csr_pem: _Optional[bytes] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_bundle_pem")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_bundle_pem: bytes
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_bundle_pem: _Optional[bytes] = ...) -> None: ...
