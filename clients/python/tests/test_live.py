"""Drives a live aitl server through the generated Python stubs.

Run by the Rust test `python_client` (cargo test), which starts a server, seeds
a Generate interaction and sets:
  AITL_ADDR       host:port of the server
  AITL_SEED_JSON  {"interaction_id": str, "candidate_ids": [str, str],
                   "knowledge_ids": [str, ...]}
"""

import json
import os
import sys
import unittest
import uuid
from datetime import timedelta

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aitl_client.aitl.v1 import common_pb2, knowledge_pb2, knowledge_pb2_grpc
from aitl_client.aitl.v1 import support_pb2, support_pb2_grpc

ADDR = os.environ.get("AITL_ADDR")
NOT_CONFIGURED = (
    "AITL_ADDR is not set. This test needs a live server: it is run by the Rust "
    "test `python_client` (cargo test), which starts the server and sets "
    "AITL_ADDR and AITL_SEED_JSON."
)
TIMEOUT = 10  # seconds per RPC, so a stuck server fails the test instead of hanging it


class LiveTest(unittest.TestCase):
    channel = None

    @classmethod
    def setUpClass(cls):
        if not ADDR:
            return  # setUp fails every test with NOT_CONFIGURED
        cls.channel = grpc.insecure_channel(ADDR)
        try:
            grpc.channel_ready_future(cls.channel).result(timeout=TIMEOUT)
        except grpc.FutureTimeoutError:
            raise AssertionError(f"no aitl server answers at AITL_ADDR={ADDR}") from None
        cls.knowledge = knowledge_pb2_grpc.KnowledgeServiceStub(cls.channel)
        cls.support = support_pb2_grpc.SupportServiceStub(cls.channel)
        # Ids are unique per run: the server's knowledge base and log persist.
        cls.prefix = f"pytest-{uuid.uuid4().hex}"

    @classmethod
    def tearDownClass(cls):
        if cls.channel is not None:
            cls.channel.close()

    def setUp(self):
        if not ADDR:
            self.fail(NOT_CONFIGURED)

    def assertRpcError(self, code, call, *args, **kwargs):
        with self.assertRaises(grpc.RpcError) as ctx:
            call(*args, timeout=TIMEOUT, **kwargs)
        self.assertEqual(ctx.exception.code(), code, ctx.exception.details())
        return ctx.exception

    def upsert(self, *batches):
        reqs = (knowledge_pb2.UpsertKnowledgeRequest(objects=b) for b in batches)
        return self.knowledge.UpsertKnowledge(reqs, timeout=TIMEOUT)

    def get(self, id, **kwargs):
        return self.knowledge.GetKnowledge(
            knowledge_pb2.GetKnowledgeRequest(id=id, **kwargs), timeout=TIMEOUT)

    def list_ids(self, filter, page_size=0):
        ids, token = [], ""
        while True:
            page = self.knowledge.ListKnowledge(
                knowledge_pb2.ListKnowledgeRequest(
                    page_size=page_size, page_token=token, filter=filter),
                timeout=TIMEOUT)
            ids += [o.id for o in page.objects]
            token = page.next_page_token
            if not token:
                return ids


class KnowledgeTest(LiveTest):
    def obj(self, name, text, group, kind=common_pb2.KNOWLEDGE_KIND_POLICY):
        return common_pb2.KnowledgeObject(
            id=f"{self.prefix}-{name}", kind=kind, title=name.title(), text=text,
            metadata={"suite": self.prefix, "group": group})

    def test_knowledge_lifecycle(self):
        a = self.obj("a", "Refunds within 30 days.", "x")
        b = self.obj("b", "Shipping takes 3 days.", "y", common_pb2.KNOWLEDGE_KIND_FAQ)
        c = self.obj("c", "Escalate after two failed replies.", "x")

        resp = self.upsert([a, b], [c])
        self.assertEqual(
            (resp.inserted, resp.updated, resp.unchanged, resp.batches), (3, 0, 0, 2))

        got = self.get(a.id)
        self.assertEqual(got.text, a.text)
        self.assertEqual(got.title, a.title)
        self.assertEqual(got.kind, a.kind)
        self.assertEqual(dict(got.metadata), dict(a.metadata))
        self.assertEqual(got.version, 1)
        self.assertFalse(got.deleted)

        a2 = common_pb2.KnowledgeObject()
        a2.CopyFrom(a)
        a2.text = "Refunds within 60 days."
        resp = self.upsert([a2, b])
        self.assertEqual(
            (resp.inserted, resp.updated, resp.unchanged, resp.batches), (0, 1, 1, 1))
        self.assertEqual((self.get(a.id).version, self.get(a.id).text), (2, a2.text))
        self.assertEqual(self.get(a.id, version=1).text, a.text)
        self.assertEqual(self.get(b.id).version, 1)

        group_x = common_pb2.KnowledgeFilter(metadata={"suite": self.prefix, "group": "x"})
        self.assertEqual(self.list_ids(group_x), [a.id, c.id])
        # page_size 1 forces paging through next_page_token.
        self.assertEqual(self.list_ids(group_x, page_size=1), [a.id, c.id])
        faq = common_pb2.KnowledgeFilter(
            kinds=[common_pb2.KNOWLEDGE_KIND_FAQ], metadata={"suite": self.prefix})
        self.assertEqual(self.list_ids(faq), [b.id])

        deleted = self.knowledge.DeleteKnowledge(
            knowledge_pb2.DeleteKnowledgeRequest(id=c.id), timeout=TIMEOUT)
        self.assertEqual(deleted.version, 2)
        self.assertRpcError(grpc.StatusCode.NOT_FOUND, self.knowledge.GetKnowledge,
                            knowledge_pb2.GetKnowledgeRequest(id=c.id))
        tombstone = self.get(c.id, include_deleted=True)
        self.assertTrue(tombstone.deleted)
        self.assertEqual(tombstone.version, 2)
        self.assertEqual(self.list_ids(group_x), [a.id])

        self.assertRpcError(grpc.StatusCode.NOT_FOUND, self.knowledge.DeleteKnowledge,
                            knowledge_pb2.DeleteKnowledgeRequest(id=f"{self.prefix}-nope"))


class RetrieveTest(LiveTest):
    def test_empty_query_is_invalid(self):
        self.assertRpcError(grpc.StatusCode.INVALID_ARGUMENT, self.support.Retrieve,
                            support_pb2.RetrieveRequest(query=""))

    def test_unavailable_without_embedding_model(self):
        err = self.assertRpcError(grpc.StatusCode.UNAVAILABLE, self.support.Retrieve,
                                  support_pb2.RetrieveRequest(query="Can I get a refund?"))
        self.assertIn("embedding", err.details().lower())


class AnnotationTest(LiveTest):
    def setUp(self):
        super().setUp()
        raw = os.environ.get("AITL_SEED_JSON")
        if not raw:
            self.fail("AITL_SEED_JSON is not set; the Rust test `python_client` sets it.")
        self.seed = json.loads(raw)
        self.assertEqual(len(self.seed["candidate_ids"]), 2, self.seed)
        self.assertTrue(self.seed["knowledge_ids"], self.seed)

    def annotation(self, name, **kind):
        # Shown a little in the past so annotated_at is never ahead of the server.
        now = Timestamp()
        now.GetCurrentTime()
        shown_at, annotated_at = Timestamp(), Timestamp()
        shown_at.FromNanoseconds(now.ToNanoseconds() - 10 * 10**9)
        annotated_at.FromNanoseconds(shown_at.ToNanoseconds() + 3 * 10**9)
        return support_pb2.SubmitAnnotationRequest(annotation=support_pb2.Annotation(
            annotation_id=f"{self.prefix}-{name}",
            interaction_id=self.seed["interaction_id"],
            agent_id="agent-py", case_id="case-py",
            shown_at=shown_at, annotated_at=annotated_at, **kind))

    def submit(self, req):
        return self.support.SubmitAnnotation(req, timeout=TIMEOUT)

    def relevance(self, ids):
        return support_pb2.KnowledgeRelevance(judgements=[
            support_pb2.KnowledgeJudgement(
                knowledge_id=k, label=support_pb2.RELEVANCE_LABEL_RELEVANT) for k in ids])

    def test_pairwise_preference_is_idempotent(self):
        preferred, other = self.seed["candidate_ids"]
        req = self.annotation("pref", preference=support_pb2.PairwisePreference(
            preferred_candidate_id=preferred, other_candidate_id=other,
            strength=support_pb2.PREFERENCE_STRENGTH_BETTER, rationale="Cites the policy."))

        first = self.submit(req)
        self.assertEqual(first.annotation_id, req.annotation.annotation_id)
        self.assertFalse(first.duplicate)
        self.assertGreater(first.log_sequence, 0)
        self.assertEqual(first.annotation_delay.ToTimedelta(), timedelta(seconds=3))

        again = self.submit(req)
        self.assertTrue(again.duplicate)
        self.assertEqual(again.log_sequence, first.log_sequence)

        changed = support_pb2.SubmitAnnotationRequest()
        changed.CopyFrom(req)
        changed.annotation.preference.rationale = "Shorter."
        self.assertRpcError(grpc.StatusCode.ALREADY_EXISTS,
                            self.support.SubmitAnnotation, changed)

    def test_relevance_on_shown_knowledge(self):
        resp = self.submit(self.annotation(
            "rel", relevance=self.relevance(self.seed["knowledge_ids"])))
        self.assertFalse(resp.duplicate)
        self.assertGreater(resp.log_sequence, 0)

    def test_relevance_on_knowledge_not_shown_is_invalid(self):
        # The object exists, so the only thing wrong is that it was not shown.
        unshown = common_pb2.KnowledgeObject(
            id=f"{self.prefix}-unshown", kind=common_pb2.KNOWLEDGE_KIND_OTHER,
            text="Never shown in the seeded interaction.")
        self.assertEqual(self.upsert([unshown]).inserted, 1)
        err = self.assertRpcError(
            grpc.StatusCode.INVALID_ARGUMENT, self.support.SubmitAnnotation,
            self.annotation("rel-unshown", relevance=self.relevance([unshown.id])))
        self.assertIn("knowledge_id", err.details())

    def test_unknown_interaction_is_not_found(self):
        req = self.annotation("unknown", preference=support_pb2.PairwisePreference(
            preferred_candidate_id=self.seed["candidate_ids"][0],
            other_candidate_id=self.seed["candidate_ids"][1],
            strength=support_pb2.PREFERENCE_STRENGTH_SLIGHTLY_BETTER))
        req.annotation.interaction_id = f"{self.prefix}-no-such-interaction"
        self.assertRpcError(grpc.StatusCode.NOT_FOUND, self.support.SubmitAnnotation, req)


if __name__ == "__main__":
    unittest.main()
