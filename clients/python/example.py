"""Minimal aitl client: fill the knowledge base, retrieve, send feedback.

    python example.py [host:port]      (or set AITL_ADDR; default 127.0.0.1:50051)
"""

import os
import sys
import time
import uuid

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

# Lets the example run from any directory without installing anything.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aitl_client.aitl.v1 import common_pb2, knowledge_pb2, knowledge_pb2_grpc
from aitl_client.aitl.v1 import support_pb2, support_pb2_grpc

OBJECTS = [
    common_pb2.KnowledgeObject(
        id="example-refund-policy",
        kind=common_pb2.KNOWLEDGE_KIND_POLICY,
        title="Refunds",
        text="Orders can be refunded within 30 days of delivery.",
        metadata={"source": "example"},
    ),
    common_pb2.KnowledgeObject(
        id="example-faq-shipping",
        kind=common_pb2.KNOWLEDGE_KIND_FAQ,
        title="How long does shipping take?",
        text="Standard shipping takes 3 to 5 business days.",
        metadata={"source": "example"},
    ),
]


def upsert(knowledge):
    # UpsertKnowledge is client-streaming: each request is one atomic batch.
    batches = (knowledge_pb2.UpsertKnowledgeRequest(objects=[o]) for o in OBJECTS)
    resp = knowledge.UpsertKnowledge(batches, timeout=10)
    print(f"upserted: inserted={resp.inserted} updated={resp.updated} "
          f"unchanged={resp.unchanged} batches={resp.batches}")


def list_examples(knowledge):
    req = knowledge_pb2.ListKnowledgeRequest(
        filter=common_pb2.KnowledgeFilter(metadata={"source": "example"}))
    while True:
        page = knowledge.ListKnowledge(req, timeout=10)
        for o in page.objects:
            print(f"  {o.id} v{o.version}: {o.title}")
        if not page.next_page_token:
            return
        req.page_token = page.next_page_token


def retrieve(support):
    """Returns the RetrieveResponse, or None when the server cannot embed yet."""
    try:
        return support.Retrieve(
            support_pb2.RetrieveRequest(query="Can I get my money back?", top_k=5),
            timeout=30,
        )
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        print(f"Retrieve unavailable (is an embedding model configured?): {err.details()}")
        return None


def relevance_annotation(resp, shown_at):
    annotated_at = Timestamp()
    annotated_at.GetCurrentTime()
    return support_pb2.SubmitAnnotationRequest(annotation=support_pb2.Annotation(
        # Client-chosen idempotency key: retrying with the same id is safe.
        annotation_id=str(uuid.uuid4()),
        interaction_id=resp.interaction_id,
        agent_id="example-agent",
        shown_at=shown_at,
        annotated_at=annotated_at,
        relevance=support_pb2.KnowledgeRelevance(judgements=[
            support_pb2.KnowledgeJudgement(
                knowledge_id=r.knowledge.id,
                label=support_pb2.RELEVANCE_LABEL_RELEVANT if r.rank == 1
                else support_pb2.RELEVANCE_LABEL_IRRELEVANT,
            )
            for r in resp.results
        ]),
    ))


def main():
    addr = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("AITL_ADDR", "127.0.0.1:50051")
    with grpc.insecure_channel(addr) as channel:
        knowledge = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
        support = support_pb2_grpc.SupportServiceStub(channel)

        upsert(knowledge)
        print("example objects:")
        list_examples(knowledge)

        shown_at = Timestamp()
        shown_at.GetCurrentTime()
        resp = retrieve(support)
        if resp is None:
            print("skipping SubmitAnnotation: it needs a Retrieve interaction")
            return
        print(f"interaction {resp.interaction_id}:")
        for r in resp.results:
            print(f"  #{r.rank} {r.knowledge.id} score={r.score:.3f}")

        time.sleep(1)  # stands in for the agent reading the results
        ack = support.SubmitAnnotation(relevance_annotation(resp, shown_at), timeout=10)
        print(f"annotation {ack.annotation_id}: log_sequence={ack.log_sequence} "
              f"delay={ack.annotation_delay.ToTimedelta()} duplicate={ack.duplicate}")


if __name__ == "__main__":
    main()
