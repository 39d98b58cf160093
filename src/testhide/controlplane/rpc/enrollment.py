"""Agent enrollment, on the API port."""

from __future__ import annotations

import grpc

from testhide.controlplane.ca.enrollment import Enrollment
from testhide.controlplane.rpc.status import mapped
from testhide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc


class EnrollmentServicer(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(self, enrollment: Enrollment, agent_port: int) -> None:
        self._enrollment = enrollment
        self._agent_port = agent_port

    @mapped
    async def Enroll(
        self,
        request: enrollment_pb2.EnrollRequest,
        context: grpc.aio.ServicerContext[enrollment_pb2.EnrollRequest, enrollment_pb2.EnrollResponse],
    ) -> enrollment_pb2.EnrollResponse:
        enrolled = await self._enrollment.enroll(
            request.token, request.csr_pem, request.name, source_ip=context.peer()
        )
        return enrollment_pb2.EnrollResponse(
            agent_id=enrolled.agent_id,
            certificate_pem=enrolled.certificate_pem,
            ca_bundle_pem=enrolled.ca_bundle_pem,
            agent_endpoint=f":{self._agent_port}",
        )
