"""Placeholder until the stream-ownership branch lands: adds no proofs yet."""


def with_proofs(verb, request):
    return dict(request)
