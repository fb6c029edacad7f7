"""Names that cross the wire between ServerApp and ClientApp, defined once.

Record keys in a Message's RecordDict, and metric keys in its MetricRecords. Everything a
client sends back is listed here and in docs/threat-model.md ("What leaves a site"):
the DP-trained weights and these metrics, nothing else.
"""

ARRAYS = "arrays"  # ArrayRecord: global weights (to clients) / trained weights (to server)
CONFIG = "config"  # ConfigRecord: the run's resolved config plus ROUND
METRICS = "metrics"  # MetricRecord in every reply

ROUND = "server-round"  # injected by Flower's strategies into CONFIG
PARTITIONS = "partitions"  # simulation: in CONFIG, the partition each slot serves (-1: none)

# Train replies
NUM_EXAMPLES = "num-examples"  # training records (FedAvg weight); eval: units averaged over
UNIT_WEIGHT = "unit-weight"  # always 1: the equal weights user-level DP-FedAvg needs
TRAIN_LOSS = "train-loss"  # simulations only: a deployed site sends no statistic of its records
EPSILON = "epsilon"  # the site's largest per-record epsilon after this round (its ledger)
NOISE_MULTIPLIER = "noise-multiplier"
STEPS = "steps"

# Error codes of replies that carry no update. A deployed site's reply carries one of the
# REASONS words as its error reason and nothing else: the full text stays in its own log.
DECLINED_BUDGET = 4030  # the site's privacy budget does not allow this round
DECLINED_POLICY = 4031  # the site refuses the run's settings (e.g. no record-level DP)
FAILED_DATA = 4032  # the site's records do not fit the run (schema, labels, too few)
FAILED_INTERNAL = 5000  # anything else that went wrong at the site
DROPPED_OUT = 5030  # injected fault (simulation): the site failed after training

REASON_BUDGET = "budget"
REASON_POLICY = "policy"
REASON_DATA = "data"
REASON_INTERNAL = "internal"
REASONS = {DECLINED_BUDGET: REASON_BUDGET, DECLINED_POLICY: REASON_POLICY,
           FAILED_DATA: REASON_DATA, FAILED_INTERNAL: REASON_INTERNAL}
