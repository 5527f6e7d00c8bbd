"""The validate stage: intake stream -> ready lanes by priority."""
