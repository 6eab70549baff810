"""`cbir evaluate`: the original study's retrieval evaluation (trec_eval MAP@100, P@k) and more.

    features   decode the collection once, embed it once (raw embeddings + probabilities, cached)
    runs       rankings: exact FAISS search, the indexed store, or a running search API
    metrics    trec_eval through pytrec_eval, and the numpy metrics it is checked against
    ablations  one-hot weight, PCA dims, fusion and exact-vs-HNSW, reusing the embeddings
    figures    precision–recall, per-class AP, confusion matrix, example queries
    report     JSON and Markdown under reports/
    compare    `cbir compare`: the study's table of systems (BOVW and six deep models) from their results
"""
