"""The key broker: releases data keys only to workers whose attestation passes the policy."""
